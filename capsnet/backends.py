"""What differs per Keras backend: how one training or validation step runs, and on which devices.

`training.Trainer` runs the same epoch loop on every backend; it asks a *steps* object for

- `build_optimizer()`: create the optimizer's variables (before a backup is restored into them);
- `reload()`: take the model's and optimizer's variables as the state to train from;
- `train(*batch)` / `evaluate(*batch)`: one step on a batch of NumPy arrays (`(x, y)`, or what the
  `losses.Objective` takes), returning the sums over its samples of `training.SUMS` (total loss, margin
  loss, reconstruction MSE, correct predictions) as a NumPy array;
- `train_many(*stacked)`: K consecutive training steps in one call, on the K batches stacked along a
  new first axis (`[K, batch, ...]` each), returning each step's sums, `[K, len(SUMS)]`. It does what K
  calls of `train` would (same batches, order and optimizer updates; the learning-rate schedule reads
  the optimizer's step counter, which advances per step), but the host dispatches once per K steps:
  what a GPU step of a few milliseconds spends waiting on Python is paid K times less often
  (`--steps_per_execution`, as `steps_per_execution` in Keras' `compile`);
- `sync()`: make the model's and optimizer's variables hold the trained values (before they are saved).

Three implementations of `Steps`:

- `TensorFlowSteps`: a `tf.function` step under any `tf.distribute` strategy (one device,
  `MirroredStrategy` over several, `MultiWorkerMirroredStrategy` over machines, under which Keras 3's
  `model.fit` fails: keras-team/keras#20585); each replica takes its slice of the global batch, and the
  Keras optimizer all-reduces the gradients.
- `JaxSteps`: a `jax.jit` pure function of the variables (`model.stateless_call`,
  `optimizer.stateless_apply`), data-parallel through `keras.distribution.DataParallel` when one is set:
  the batch is sharded over the devices and XLA inserts the gradient all-reduce.
- `TorchSteps`: an eager PyTorch step (`loss.backward()`, then the Keras optimizer), as Keras' own
  torch trainer runs it; under `torch.distributed` each process takes its slice of the global batch
  and the gradients are summed across processes (`all_reduce`) before the update.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from capsnet.losses import ONE_DIGIT, Objective


def make_steps(model: keras.Model, optimizer: Any, lam_recon: float, batch_size: int,
               strategy: Any = None, objective: Objective = ONE_DIGIT) -> Any:
    """The steps object for the current Keras backend.

    Args:
        model: the train model `[x, y] -> [lengths, reconstruction]`.
        optimizer: the optimizer to apply (built here if needed).
        lam_recon: weight of the reconstruction MSE in the loss.
        batch_size: the global batch size; each step's loss is its sum over the samples divided by it,
            so that summing over replicas gives the global batch mean.
        strategy: TensorFlow only: the `tf.distribute` strategy (default: the current one).
        objective: how a batch feeds the model and what is summed (`losses.ONE_DIGIT`, `TWO_DIGITS`).

    Raises:
        ValueError: the backend is not TensorFlow, JAX or PyTorch.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return TensorFlowSteps(model, optimizer, lam_recon, batch_size, strategy, objective=objective)
    if backend == "jax":
        return JaxSteps(model, optimizer, lam_recon, batch_size, objective=objective)
    if backend == "torch":
        return TorchSteps(model, optimizer, lam_recon, batch_size, objective=objective)
    raise ValueError(f"the {backend} backend is not supported for training; use tensorflow, jax or torch")


class Steps:
    """What every backend's steps hold: the train model, its optimizer, and how the loss is made.

    Args:
        model, optimizer, lam_recon, batch_size, objective: see `make_steps`.
    """

    def __init__(self, model: keras.Model, optimizer: Any, lam_recon: float, batch_size: int,
                 objective: Objective = ONE_DIGIT) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lam_recon = lam_recon
        self.batch_size = batch_size
        self.objective = objective

    def build_optimizer(self) -> None:
        self.optimizer.build(self.model.trainable_variables)

    def train_many(self, *stacked: np.ndarray) -> np.ndarray:
        """K training steps, one `train` call each: the backends that compile override it with one
        call for all K."""
        return np.stack([self.train(*(a[i] for a in stacked)) for i in range(len(stacked[0]))])


class TensorFlowSteps(Steps):
    """Steps as `tf.function`s under a `tf.distribute` strategy.

    Args:
        model, optimizer, lam_recon, batch_size, objective: see `make_steps`.
        strategy: the `tf.distribute` strategy; the current one (one device) by default.
        jit_compile: compile the steps with XLA (off by default: on CPUs XLA compiles the backward of
            the strided 9x9 convolution into a far slower step; measure before turning it on).
    """

    def __init__(self, model: keras.Model, optimizer: Any, lam_recon: float, batch_size: int,
                 strategy: Any = None, jit_compile: bool = False, objective: Objective = ONE_DIGIT) -> None:
        import tensorflow as tf

        super().__init__(model, optimizer, lam_recon, batch_size, objective)
        self.tf = tf
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.train_step = tf.function(self._train_step, jit_compile=jit_compile, reduce_retracing=True)
        self.eval_step = tf.function(self._eval_step, jit_compile=jit_compile, reduce_retracing=True)
        self.multi_train_step = tf.function(self._multi_train_step, jit_compile=jit_compile,
                                            reduce_retracing=True)

    def build_optimizer(self) -> None:
        with self.strategy.scope():  # the optimizer's slots are mirrored like the weights
            super().build_optimizer()

    def reload(self) -> None:
        """Nothing to do: the steps read the variables themselves."""

    def sync(self) -> None:
        """Nothing to do: the steps update the variables themselves."""

    def train(self, *batch: np.ndarray) -> np.ndarray:
        return np.array([float(v) for v in self.train_step(*(self._split(a) for a in batch))])

    def train_many(self, *stacked: np.ndarray) -> np.ndarray:
        # The count as a tensor: the last, shorter call of an epoch reuses the traced loop.
        count = self.tf.constant(len(stacked[0]), dtype=self.tf.int32)
        sums = self.multi_train_step(count, *(self._split(a, axis=1) for a in stacked))
        return np.asarray(sums, dtype=np.float64)

    def evaluate(self, *batch: np.ndarray) -> np.ndarray:
        if len(batch[0]) < self.replicas:
            # Some replica would get an empty slice, which the convolutions refuse: a batch this small
            # is evaluated on one device.
            return np.array([float(v) for v in self._replica_eval_step(*batch)])
        return np.array([float(v) for v in self.eval_step(*(self._split(a) for a in batch))])

    # -- inside the strategy -----------------------------------------------------------------

    def _split(self, array: np.ndarray, axis: int = 0) -> Any:
        """The global batch as each replica's slice (replica i of n takes the i-th of n near-equal
        parts, as `tf.data` rebatching would), or as it is on one device. `axis`: the batch axis (1
        for `train_many`'s stacked batches)."""
        if self.replicas == 1:
            return self.tf.constant(array)
        parts = np.array_split(array, self.replicas, axis=axis)
        return self.strategy.experimental_distribute_values_from_function(
            lambda context: self.tf.constant(parts[context.replica_id_in_sync_group]))

    def _replica_terms(self, batch: tuple[Any, ...], training: bool) -> tuple[Any, ...]:
        outputs = self.model(self.objective.inputs(batch), training=training)
        return self.objective.terms(batch, outputs, self.lam_recon)

    def _replica_train_step(self, *batch: Any) -> list[Any]:
        with self.tf.GradientTape() as tape:
            terms = self._replica_terms(batch, training=True)
            # Sum over the replica's samples / global batch: the all-reduced SUM of gradients is then
            # the gradient of the global batch mean.
            loss = keras.ops.sum(terms[0]) / self.batch_size
            scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
        variables = self.model.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return [keras.ops.sum(t) for t in terms]

    def _replica_eval_step(self, *batch: Any) -> list[Any]:
        return [keras.ops.sum(t) for t in self._replica_terms(batch, training=False)]

    def _reduce(self, per_replica: list[Any]) -> list[Any]:
        return [self.strategy.reduce(self.tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica]

    def _train_step(self, *batch: Any) -> list[Any]:
        return self._reduce(self.strategy.run(self._replica_train_step, args=batch))

    def _eval_step(self, *batch: Any) -> list[Any]:
        return self._reduce(self.strategy.run(self._replica_eval_step, args=batch))

    def _multi_train_step(self, count: Any, *stacked: Any) -> Any:
        """`count` steps in one graph: a `tf.while_loop` (autograph) whose step i is `_train_step` on
        the i-th stacked batch; returns `[count, len(SUMS)]`."""
        tf = self.tf
        sums = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            step_sums = self._reduce(self.strategy.run(self._replica_train_step_at, args=(i, *stacked)))
            sums = sums.write(i, tf.stack([tf.cast(v, tf.float32) for v in step_sums]))
        return sums.stack()

    def _replica_train_step_at(self, i: Any, *stacked: Any) -> list[Any]:
        return self._replica_train_step(*(a[i] for a in stacked))


class JaxSteps(Steps):
    """Steps as `jax.jit` pure functions of the variables.

    The variables live in `self.state` between `reload()` and `sync()`, as in Keras' own JAX trainer.
    Under `keras.distribution.DataParallel` (set before the model is built, so that its variables are
    replicated) each batch is sharded over the devices; XLA then sums the gradients across them.
    Validation batches are padded to the full batch size and the padding masked out, so that one
    compiled step serves every batch and every batch divides over the devices.
    """

    def __init__(self, model: keras.Model, optimizer: Any, lam_recon: float, batch_size: int,
                 objective: Objective = ONE_DIGIT) -> None:
        import jax

        super().__init__(model, optimizer, lam_recon, batch_size, objective)
        self.jax = jax
        self.distribution = keras.distribution.distribution()
        self.replicas = len(self.distribution.device_mesh.devices.flat) if self.distribution else 1
        self.state: tuple | None = None
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step)
        self.multi_train_step = jax.jit(self._multi_train_step, donate_argnums=0)

    def reload(self) -> None:
        self.state = (
            [v.value for v in self.model.trainable_variables],
            [v.value for v in self.model.non_trainable_variables],
            [v.value for v in self.optimizer.variables],
        )

    def sync(self) -> None:
        trainable, non_trainable, optimizer = self.state
        for variables, values in ((self.model.trainable_variables, trainable),
                                  (self.model.non_trainable_variables, non_trainable),
                                  (self.optimizer.variables, optimizer)):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)

    def train(self, *batch: np.ndarray) -> np.ndarray:
        self.state, sums = self.train_step(self.state, tuple(self._place(a) for a in batch))
        return np.asarray(sums, dtype=np.float64)

    def train_many(self, *stacked: np.ndarray) -> np.ndarray:
        self.state, sums = self.multi_train_step(self.state, tuple(self._place(a, axis=1) for a in stacked))
        return np.asarray(sums, dtype=np.float64)

    def evaluate(self, *batch: np.ndarray) -> np.ndarray:
        n = len(batch[0])
        weight = np.zeros(self.batch_size, dtype="float32")
        weight[:n] = 1.0
        padded = tuple(np.pad(a, [(0, self.batch_size - n)] + [(0, 0)] * (a.ndim - 1)) for a in batch)
        sums = self.eval_step(self.state, tuple(self._place(a) for a in padded), self._place(weight))
        return np.asarray(sums, dtype=np.float64)

    def _place(self, array: np.ndarray, axis: int = 0) -> Any:
        """The batch on the devices: sharded along its batch axis (`axis`; 1 for `train_many`'s stacked
        batches) under a distribution."""
        if self.distribution is None:
            return array
        layout = self.distribution.get_data_layout(array.shape[axis:])
        if axis:
            layout = keras.distribution.TensorLayout([None] * axis + list(layout.axes), layout.device_mesh)
        return keras.distribution.distribute_tensor(array, layout)

    # -- pure functions (traced by jax.jit) ----------------------------------------------------

    def _terms(self, trainable: list, non_trainable: list, batch: tuple, training: bool
               ) -> tuple[tuple[Any, ...], list]:
        outputs, non_trainable = self.model.stateless_call(
            trainable, non_trainable, self.objective.inputs(batch), training=training)
        return self.objective.terms(batch, outputs, self.lam_recon), non_trainable

    def _train_step(self, state: tuple, batch: tuple) -> tuple[tuple, Any]:
        trainable, non_trainable, optimizer = state

        def loss(trainable: list) -> tuple[Any, tuple]:
            terms, new_non_trainable = self._terms(trainable, non_trainable, batch, training=True)
            return keras.ops.sum(terms[0]) / self.batch_size, (terms, new_non_trainable)

        (_, (terms, non_trainable)), grads = self.jax.value_and_grad(loss, has_aux=True)(trainable)
        trainable, optimizer = self.optimizer.stateless_apply(optimizer, grads, trainable)
        sums = keras.ops.stack([keras.ops.sum(t) for t in terms])
        return (trainable, non_trainable, optimizer), sums

    def _multi_train_step(self, state: tuple, stacked: tuple) -> tuple[tuple, Any]:
        """`_train_step` on each of the stacked batches in turn (`lax.scan`): one compiled call; returns
        the state after the last and every step's sums, `[K, len(SUMS)]`."""
        return self.jax.lax.scan(self._train_step, state, stacked)

    def _eval_step(self, state: tuple, batch: tuple, weight: Any) -> Any:
        trainable, non_trainable, _ = state
        terms, _ = self._terms(trainable, non_trainable, batch, training=False)
        return keras.ops.stack([keras.ops.sum(t * weight) for t in terms])


class TorchSteps(Steps):
    """Steps run eagerly on PyTorch: forward, `loss.backward()`, the Keras optimizer's update.

    The model's variables are the tensors the steps update in place, so `reload()` and `sync()` have
    nothing to do. When `torch.distributed` is initialised (`torchrun`), each process takes its
    near-equal slice of the global batch (as `TensorFlowSteps._split`), the loss is its slice's sum
    divided by the global batch size, and the gradients and the returned sums are summed over the
    processes (`all_reduce`): every process then applies the gradient of the global batch mean, and
    the replicas stay identical without a separate broadcast of the weights after the first.

    Args:
        model, optimizer, lam_recon, batch_size, objective: see `make_steps`.
    """

    def __init__(self, model: keras.Model, optimizer: Any, lam_recon: float, batch_size: int,
                 objective: Objective = ONE_DIGIT) -> None:
        import torch

        super().__init__(model, optimizer, lam_recon, batch_size, objective)
        self.torch = torch
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.replicas = torch.distributed.get_world_size() if distributed else 1
        self.rank = torch.distributed.get_rank() if distributed else 0

    def reload(self) -> None:
        """Makes every process start from the chief's variables (a no-op on one process)."""
        if self.replicas == 1:
            return
        with self.torch.no_grad():
            for variable in self.model.variables + self.optimizer.variables:
                self.torch.distributed.broadcast(variable.value, src=0)

    def sync(self) -> None:
        """Nothing to do: the steps update the variables themselves."""

    def train(self, *batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        terms = self._terms(self._slice(batch), training=True)
        # Sum over this process's samples / global batch: the summed gradients are then the gradient
        # of the global batch mean.
        loss = keras.ops.sum(terms[0]) / self.batch_size
        if hasattr(self.optimizer, "scale_loss"):
            loss = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        for variable in variables:
            variable.value.grad = None
        loss.backward()
        grads = [v.value.grad if v.value.grad is not None else torch.zeros_like(v.value) for v in variables]
        if self.replicas > 1:
            grads = self._all_reduce(grads)
        with torch.no_grad():
            self.optimizer.apply(grads, variables)
        return self._sums(terms)

    def _all_reduce(self, grads: list[Any]) -> list[Any]:
        """The sums of every process's `grads`: one all-reduce of them all, not one per variable."""
        flat = self.torch.cat([g.reshape(-1) for g in grads])
        self.torch.distributed.all_reduce(flat)
        parts = flat.split([g.numel() for g in grads])
        return [part.view_as(g) for part, g in zip(parts, grads, strict=True)]

    def evaluate(self, *batch: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            if len(batch[0]) < self.replicas:  # some process would get no sample: each takes it all
                return self._sums(self._terms(batch, training=False), reduce=False)
            return self._sums(self._terms(self._slice(batch), training=False))

    def _slice(self, batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """This process's part of the global batch (the i-th of n near-equal parts)."""
        if self.replicas == 1:
            return batch
        return tuple(np.array_split(a, self.replicas)[self.rank] for a in batch)

    def _terms(self, batch: tuple[np.ndarray, ...], training: bool) -> tuple[Any, ...]:
        tensors = tuple(keras.ops.convert_to_tensor(a) for a in batch)
        outputs = self.model(self.objective.inputs(tensors), training=training)
        return self.objective.terms(tensors, outputs, self.lam_recon)

    def _sums(self, terms: tuple[Any, ...], reduce: bool = True) -> np.ndarray:
        sums = self.torch.stack([self.torch.sum(t.detach()) for t in terms])
        if reduce and self.replicas > 1:
            self.torch.distributed.all_reduce(sums)
        return sums.cpu().double().numpy()
