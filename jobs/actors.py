"""What the bulk jobs' Ray Data actors share: a model loaded once per actor, and how many CPUs each gets
(refused when the cluster cannot hold the actors: an actor pool that cannot start waits for ever)."""

from __future__ import annotations

from jobs.errors import JobError


class ModelActor:
    """Loads the checkpoint's model once, on the actor's GPU or its CPUs, in ``dtype``."""

    def __init__(self, checkpoint: bytes, dtype: str, batch_size: int, gpu: bool, cpus: float):
        import torch

        from pixelcnn.checkpoint import load_checkpoint, model_from_checkpoint

        self.device = torch.device("cuda" if gpu else "cpu")
        if not gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.model = model_from_checkpoint(load_checkpoint(checkpoint)).to(self.device, getattr(torch, dtype))
        self.batch_size = batch_size


def actor_cpus(*, actors: int, most: int, gpus_per_actor: float, cpus_per_actor: float | None, others: float,
               wait: bool, what: str) -> float:
    """CPUs per actor: ``cpus_per_actor``, or 1 beside a GPU, or the cluster's CPUs shared out among
    ``most`` actors after ``others`` (room for the pipeline's CPU tasks: with none left, files would wait
    for the pool to finish, and a pool that takes every CPU can hang). ``actors`` must fit now unless
    ``wait`` (an autoscaler will bring the rest)."""
    import ray

    have = ray.cluster_resources()
    cpus = cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus_per_actor else max(0.25, (have.get("CPU", 1) - others) / most)
    for resource, need, users in (("GPU", gpus_per_actor * actors, f"the {what} actors"),
                                  ("CPU", cpus * actors + others, f"the {what} actors and the pipeline's CPU tasks")):
        if need > have.get(resource, 0) and not wait:
            raise JobError(f"{need:g} {resource}s needed for {users}, the cluster has {have.get(resource, 0):g}: "
                           "fewer --num-actors or --cpus-per-actor, or --wait-for-resources on an autoscaling cluster")
    return cpus
