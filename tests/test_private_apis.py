"""The third-party private names gpt2_jax still reads, each behind one function, each
checked here so that an upgrade that moves it fails loudly instead of silently changing
behaviour.

- ``jax._src.clusters.ClusterEnv._cluster_types`` (parallel/sharding.py:
  ``detected_cluster``): the only list of the clusters ``jax.distributed.initialize()``
  detects by itself; there is no public one in jax 0.10-0.12.
- ``datasets.Dataset._indices`` (data/sources.py: ``arrow_files``): whether a dataset is
  a selection of its Arrow files' rows; without it every load would be read through
  datasets' slower row path, or a selection misread as whole files.
"""

from __future__ import annotations

from gpt2_jax.parallel import sharding


def test_jax_cluster_detectors_are_where_detected_cluster_reads_them():
    from jax._src import clusters

    kinds = clusters.ClusterEnv._cluster_types
    names = {k.__name__ for k in kinds}
    assert {"SlurmCluster", "OmpiCluster", "K8sCluster"} <= names, names
    assert all(callable(getattr(k, "is_env_present", None)) for k in kinds)


def test_detected_cluster_sees_a_slurm_job(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    assert sharding.detected_cluster() == "SlurmCluster"


def test_dataset_indices_tell_a_selection_from_whole_files(tmp_path):
    import datasets

    from gpt2_jax.data import sources

    path = tmp_path / "rows.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    ds = sources.load_files("text", "train", [str(path)], "train_files",
                            cache_dir=str(tmp_path / "cache"))["train"]  # fmt: skip
    assert isinstance(ds, datasets.Dataset)
    assert ds._indices is None  # as loaded: its files' rows, in order
    selected = ds.select([0, 2])
    assert selected._indices is not None
    assert sources.arrow_files(selected) is None  # never read as whole files
