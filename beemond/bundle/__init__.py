"""The bundle: its format and verified reader (:mod:`.format`), age encryption and SSHSIG signatures
(:mod:`.crypto`), and the device-side sealing (:mod:`.sealer`).

Nothing is imported here: the lab and the supervisor import the submodule they need, and only the
workers that seal or read a bundle load pyrage.
"""
