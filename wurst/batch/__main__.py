from wurst.batch.app import main

raise SystemExit(main())
