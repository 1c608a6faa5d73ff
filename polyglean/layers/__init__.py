"""Alternative downsampling layers: SoftPool, adaPool, BlurPool, PASA and APS.

Each layer is a pure tensor function and a thin ``nn.Module`` over it. The 2-D Modules are registered by name in
:data:`LAYERS` (``"softpool"``, ``"adapool"``, ``"blurpool"``, ``"pasa"``, ``"aps"``); :func:`get_layer` looks a
name up and :func:`create_layer` instantiates it; :func:`swap` rewrites a model's subsampling ops to one of them.

Each layer's module holds everything about it: the function, the Module, its swap rule and its op kind (how site
discovery runs it at any phase), registered together by one :func:`register_layer` call at the end of the module.
Adding a layer is that module plus its import below.

Example:
    >>> from polyglean.layers import create_layer
    >>> create_layer("blurpool", filter_size=5)
    BlurPool2d(filter_size=5, stride=(2, 2), pad_type='reflect')
"""

from polyglean.layers._registry import (
    LAYERS,
    MODEL_RULES,
    SITE_RULES,
    SWAP_RULES,
    create_layer,
    get_layer,
    list_layers,
    register_layer,
    register_site_rule,
    register_swap_rule,
    unregister_layer,
)
from polyglean.layers.adapool import AdaPool2d, ada_pool2d, edscw_pool2d
from polyglean.layers.aps import (
    APS2d,
    APSIndex2d,
    aps_gather2d,
    aps_index2d,
    aps_select2d,
    polyphase_components2d,
)
from polyglean.layers.blurpool import (
    BlurPool1d,
    BlurPool2d,
    BlurPool3d,
    binomial_filter,
    blur_pool1d,
    blur_pool2d,
    blur_pool3d,
    convert_zhang_state_dict,
    zhang_key_map,
)
from polyglean.layers.pasa import PASA2d, pasa2d, pasa_weights
from polyglean.layers.rules import SwapSequential
from polyglean.layers.swap import swap, swap_key_map
from polyglean.layers.cad import CADMask, CADPool2d, cad_pool2d, cad_swap  # registers "cad"
from polyglean.layers.softpool import (
    SoftPool1d,
    SoftPool2d,
    SoftPool3d,
    soft_pool1d,
    soft_pool2d,
    soft_pool3d,
)

__all__ = [
    "APS2d",
    "CADMask",
    "CADPool2d",
    "MODEL_RULES",
    "APSIndex2d",
    "LAYERS",
    "PASA2d",
    "AdaPool2d",
    "BlurPool1d",
    "BlurPool2d",
    "BlurPool3d",
    "SoftPool1d",
    "SoftPool2d",
    "SITE_RULES",
    "SWAP_RULES",
    "SoftPool3d",
    "SwapSequential",
    "ada_pool2d",
    "aps_gather2d",
    "aps_index2d",
    "aps_select2d",
    "binomial_filter",
    "cad_pool2d",
    "cad_swap",
    "blur_pool1d",
    "blur_pool2d",
    "blur_pool3d",
    "convert_zhang_state_dict",
    "create_layer",
    "edscw_pool2d",
    "get_layer",
    "list_layers",
    "pasa2d",
    "pasa_weights",
    "polyphase_components2d",
    "register_layer",
    "register_site_rule",
    "register_swap_rule",
    "soft_pool1d",
    "soft_pool2d",
    "soft_pool3d",
    "swap",
    "swap_key_map",
    "unregister_layer",
    "zhang_key_map",
]
