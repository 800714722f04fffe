"""Runs a script as `python SCRIPT ARGS` would, with the gradient all-reduce of Keras' TensorFlow
optimizer turned into the identity: each replica then applies the gradient of its own slice of the
batch only. The control of tests/test_multi_gpu.py, whose log must differ from a one-device run's.
On `KERAS_BACKEND=torch` the same is done to `backends.TorchSteps`, and on JAX across processes each
process trains alone on its share of each batch (tests/test_multi_process.py).

Usage: python tests/without_all_reduce.py capsulenet-multi-gpu.py --cpu --gpus 2 ...
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    import keras

    if keras.backend.backend() == "torch":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from capsnet import backends

        backends.TorchSteps._all_reduce = lambda self, grads: grads
    elif keras.backend.backend() == "jax":
        # Multi-process JAX (capsnet/distributed/jax_distributed.py): each process trains alone on its
        # own devices and its own share of every batch, as replicas that never exchange their gradients
        # (nor the sums).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import numpy as np

        from capsnet import backends
        from capsnet.distributed import jax_distributed

        def local_devices() -> list:
            import jax

            return jax.local_devices()

        def own_share(train: object) -> object:
            def step(self: object, *batch: np.ndarray) -> np.ndarray:
                import jax

                return train(self, *(np.array_split(a, jax.process_count())[jax.process_index()]
                                     for a in batch))
            return step

        jax_distributed.JaxEngine.all_devices = staticmethod(local_devices)
        backends.JaxSteps.train = own_share(backends.JaxSteps.train)
    else:
        from keras.src.backend.tensorflow import optimizer as tf_optimizer

        def no_all_reduce(self: object, grads_and_vars: list) -> list:
            return grads_and_vars

        tf_optimizer.TFOptimizer._all_reduce_sum_gradients = no_all_reduce
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")
