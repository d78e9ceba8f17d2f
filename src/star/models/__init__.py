from star.models.classifier import TransferReport, VisionMambaClassifier, classifier_from_pretrain
from star.models.hub import load_pretrained
from star.models.registry import SIZES, create_model, list_models, register_with_timm
from star.models.star import SEPARATORS, StarPretrain

register_with_timm()
