"""spikeops: exact, fast spiking LLM kernels for PyTorch.

Activations become bit-plane spike trains (``encode``), and linear layers on GPTQ weights add up
the weights of the inputs that fired (``spike_linear``, ``SpikeLinear``). The ops live in
``torch.ops.spikeops`` (CPU, and CUDA when built with it); ``spikeops.reference`` holds their
plain-PyTorch specification. ``fake_quantize`` and ``SpikeLinear`` are differentiable
(straight-through estimator; ``spikeops.autograd`` trains clipping ratios).

Importing spikeops registers the ``"spikeops"`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads spikeops checkpoints as spiking models
(``register_with_transformers``, docs/integrations.md).
"""

from .gptq import GPTQWeight, pack, unpack
from .checkpoint import save_gptq
from .models import load_gptq, patch
from .quantization import quantize
from .nn import SpikeLinear, spike_accumulate, spike_linear
from .runner import Runner
from .attention import spike_matmul
from .spikes import Encoding, SpikeTensor, encode
from .autograd import fake_quantize
from .stats import EnergyModel, Tracker, track
from .hf_quantizer import SpikeopsConfig, register_with_transformers

__all__ = ["Encoding", "SpikeTensor", "encode", "GPTQWeight", "pack", "unpack", "spike_linear",
           "spike_accumulate", "SpikeLinear", "load_gptq", "patch", "quantize", "save_gptq",
           "track", "Tracker", "EnergyModel", "Runner", "fake_quantize", "SpikeopsConfig",
           "register_with_transformers", "spike_matmul"]
__version__ = "0.1.0"

register_with_transformers()
