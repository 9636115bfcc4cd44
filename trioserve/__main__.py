from trioserve.cli import main

raise SystemExit(main())
