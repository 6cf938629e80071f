import sys

from treeopt.cli import main

# ``main`` sets OMP_WAIT_POLICY=PASSIVE (unless set) before anything imports torch.
sys.exit(main())
