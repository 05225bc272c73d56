import os
import sys

# The fault tests launch pretrain_gpt.py as a user does: reuse the functional tests' helpers (cli.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "functional"))
