import sys

from fastvlm_mlx.convert import main

sys.exit(main())
