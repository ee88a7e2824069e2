"""Model zoo: TResNet (M, L, XL, V2-L, tiny) and ResNeSt (50d, 101e), plus any timm model as timm/<name>.

    model = create_model("tresnet_m", num_classes=1000, pretrained="ckpt.pth", norm="auto")
    cfg = get_data_config(model)  # input_size, crop_pct, interpolation, mean, std
"""
from tresnet_train.models import resnest, tresnet  # noqa: F401  (registers the models)
from tresnet_train.models.weights import (convert_official_state_dict, export_timm_state_dict,
                                              load_weights, read_state_dict)
from tresnet_train.models.layers import init_non_persistent_buffers, resolve_norm_layer
from tresnet_train.models.registry import (UnknownModelError, check_model_name, create_model,
                                           get_data_config, is_known_model, list_models)

__all__ = [
    "UnknownModelError", "check_model_name", "convert_official_state_dict", "create_model", "export_timm_state_dict",
    "get_data_config", "init_non_persistent_buffers", "is_known_model", "list_models", "load_weights",
    "read_state_dict", "resolve_norm_layer",
]
