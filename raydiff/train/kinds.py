"""What `raydiff train` can train: the diffusion LM, or the reference LM that scores its samples.
Both engines share one contract, so the loop, the local runner and the Ray worker serve both."""

from raydiff.train.engine import DiffusionEngine
from raydiff.train.reference import ReferenceEngine

ENGINES = {"diffusion": DiffusionEngine, "reference": ReferenceEngine}
