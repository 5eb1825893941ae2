import sys

from internlm2_graph.cli import main

sys.exit(main())
