import sys

from napari_muvit.cli import main

sys.exit(main())
