from star.model_names import SIZES, register_with_timm
from star.models.classifier import TransferReport, VisionMambaClassifier, classifier_from_pretrain
from star.models.hub import load_pretrained
from star.models.registry import create_model, list_models
from star.models.star import SEPARATORS, StarPretrain
