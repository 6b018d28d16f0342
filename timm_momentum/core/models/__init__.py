"""Model families built on the momentum chain. Importing a family registers its models with timm."""
from .momentum_resnet import BLOCK_FNS, GAMMA_POLICIES, RECORD_KEYS, MomentumResNet, MomentumStage, parse_gamma
from .momentum_resnet import read_record, residual_branch, resnet_state_dict, resolve_gamma
from . import resnet_family  # noqa: F401  registers momentum_<name> for every timm ResNet-family architecture
