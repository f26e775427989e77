"""Prefix-aware routing keeps a prompt prefix on one replica, so the fleet's prefix cache hits
more than under least_conn: W6 of WORKLOADS.md in small (two local replicas of the tiny model,
token-id prompts: one of 5 shared 96-token prefixes plus 8 unique tokens), the same requests under
each mode, the hit rate read from the replicas' own metrics."""
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet.conftest import API_KEY, SERVED_NAME, FleetCtl

pytestmark = pytest.mark.slow  # two real replicas, 72 requests

NUM_PREFIXES, PREFIX_LEN, SUFFIX_LEN, NUM_REQUESTS = 5, 96, 8, 36


@pytest.fixture(scope="module")
def fleet(tiny_model, tmp_path_factory):
    ctl = FleetCtl(tmp_path_factory.mktemp("prefix") / "home")
    try:  # the key: the first 64 token ids (256 characters' worth), inside every shared prefix
        ctl(*ctl.up_args(tiny_model, 2, "local", "--prefix-chars", "256"))
        yield ctl
    finally:
        ctl.cleanup()


def fleet_prefix_cache(ctl: FleetCtl) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over the replicas' own /metrics."""
    hits = queries = 0.0
    for row in ctl.status()["replicas"]:
        text = httpx.get(f"http://{row['address']}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        for family in text_string_to_metric_families(text):
            if family.name == "pagefleet_prefix_cache_hits":
                hits += sum(s.value for s in family.samples)
            elif family.name == "pagefleet_prefix_cache_queries":
                queries += sum(s.value for s in family.samples)
    return hits, queries


def hit_rate_of_w6_in_small(ctl: FleetCtl, seed: int) -> float:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 40000) for _ in range(PREFIX_LEN)] for _ in range(NUM_PREFIXES)]
    hits_before, queries_before = fleet_prefix_cache(ctl)
    with httpx.Client(base_url=ctl.url, verify=ctl.ssl_context(), timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        for _ in range(NUM_REQUESTS):
            prompt = rng.choice(prefixes) + [rng.randrange(3, 40000) for _ in range(SUFFIX_LEN)]
            answer = client.post("/v1/completions", json={"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1})
            assert answer.status_code == 200, answer.text
    hits, queries = fleet_prefix_cache(ctl)
    return (hits - hits_before) / (queries - queries_before)


def test_prefix_routing_hits_the_fleets_prefix_cache_more_than_least_conn(fleet):
    least_conn = hit_rate_of_w6_in_small(fleet, seed=1)
    fleet("up", "--routing", "prefix")  # NGINX only: the replicas (and their caches) stay
    prefix = hit_rate_of_w6_in_small(fleet, seed=2)  # other prefixes: nothing cached from before
    print(f"fleet prefix-cache hit rate: least_conn {least_conn:.3f}, prefix {prefix:.3f}")
    # Each prefix misses once per replica it reaches: about twice under least_conn, once here.
    assert prefix > least_conn + 0.05, (least_conn, prefix)
    assert prefix > 0.7
