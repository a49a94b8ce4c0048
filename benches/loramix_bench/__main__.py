import sys

from loramix_bench import main

sys.exit(main())
