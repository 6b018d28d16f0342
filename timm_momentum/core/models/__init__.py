"""Model families built on the momentum chain. Importing a family registers its models with timm."""
from .momentum_model import GAMMA_POLICIES, RECORD_KEYS, MomentumModel, parse_gamma, read_record, resolve_gamma
from .momentum_model import source_state_dict
from .momentum_resnet import BLOCK_FNS, MomentumResNet, MomentumStage, residual_branch, resnet_state_dict
from . import resnet_family  # noqa: F401  registers momentum_<name> for every timm ResNet-family architecture
from .momentum_vit import VIT_BLOCK_FNS, MomentumBlocks, MomentumVisionTransformer
from . import vit_family  # noqa: F401  registers momentum_<name> for every Block-based timm ViT architecture
