"""Weight-sharing supernet of the AlphaNet / AttentiveNAS space: elastic ops, model, FLOPs, BN calibration."""
from .calibration import recalibrate_bn
from .flops import count_with_hooks, flops_and_params, mflops
from .model import ElasticSupernet, StaticSubnet, extract
from .space import ALPHANET, SPACES, TINY, SearchSpace, get_space

__all__ = ["ALPHANET", "SPACES", "TINY", "ElasticSupernet", "SearchSpace", "StaticSubnet", "count_with_hooks",
           "extract", "flops_and_params", "get_space", "mflops", "recalibrate_bn"]
