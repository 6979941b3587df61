from wurst.cli import main

raise SystemExit(main())
