import os

import pytest

# One torch thread per process: the suite runs on 2 cores beside node processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A real federation: grid + 3 data nodes as processes over TLS on loopback, DICOM phantoms."""
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    root = tmp_path_factory.mktemp("federation")
    fed = LocalFederation.create(root, default_sites(n_sites=3, shape=(32, 32, 32), n_volumes=8), fmt="dicom")
    fed.start()
    yield fed
    fed.stop()



@pytest.fixture(scope="session")
def node_identities(tmp_path_factory):
    """Seven node identities (site-a ... site-g) issued by one throwaway federation CA."""
    from identities import issue_identities

    return issue_identities(tmp_path_factory.mktemp("identities"), [f"site-{c}" for c in "abcdefg"])
