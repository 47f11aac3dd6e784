from beemond.cli import main

raise SystemExit(main())
