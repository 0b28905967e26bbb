from em_bench.cli import main

raise SystemExit(main())
