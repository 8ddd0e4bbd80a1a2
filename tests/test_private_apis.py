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


def test_arrow_files_sees_whole_files_and_selections(tmp_path):
    import datasets

    from gpt2_jax.data import sources

    path = tmp_path / "rows.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    ds = datasets.load_dataset("text", data_files=str(path), split="train",
                               cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert hasattr(ds, "_indices")
    files = sources.arrow_files(ds)
    assert files and all(f.endswith(".arrow") for f in files)
    assert sources.arrow_files(ds.select([0, 2])) is None  # a selection: not whole files
