from voxgrid.cli import main

raise SystemExit(main())
