"""Test-wide settings: one torch thread, since two threads on two loaded cores can be 100x slower."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
