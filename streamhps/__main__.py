from streamhps.cli import main

raise SystemExit(main())
