from bonedist.cli import main

raise SystemExit(main())
