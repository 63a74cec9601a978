"""``python -m crfrnn_deeplab.predict``: the prediction command line (:mod:`crfrnn_deeplab.predict.cli`)."""

import sys

from crfrnn_deeplab.predict.cli import main

sys.exit(main())
