from diffusion_align.cli import main

raise SystemExit(main())
