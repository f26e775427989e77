"""`fleetctl up --group NAME=MODEL,...`: the command line's form of a fleet file's groups."""
import pytest

from fleetctl.config import FleetConfig
from fleetctl.errors import ConfigError
from fleetctl.groups import parse_group_option
from fleetctl.up_options import given_options


def test_group_options_become_the_fleet_files_groups():
    given = given_options({"group": ("chat=smollm2,replicas=2,served=chat,max_num_seqs=8,enable_prefix_caching=false",
                                     "small=/models/small,gpus=0:1,enforce_eager=true,kv_cache_dtype=fp8")})
    config = FleetConfig(**given)
    chat, small = config.model_groups()
    assert (chat.name, chat.model, chat.num_replicas, chat.served_model_name) == ("chat", "smollm2", 2, "chat")
    assert chat.engine == {"max_num_seqs": 8, "enable_prefix_caching": False}
    assert chat.engine_args() == ["--no-enable-prefix-caching", "--max-num-seqs", "8"]
    assert (small.gpus, small.engine) == (["0", "1"], {"enforce_eager": True, "kv_cache_dtype": "fp8"})
    assert small.engine_args() == ["--enforce-eager", "--kv-cache-dtype", "fp8"]


@pytest.mark.parametrize("text, words", [
    ("smollm2", "start with NAME=MODEL"),
    ("chat=smollm2,replicas=two", "whole number"),
    ("chat=smollm2,max_num_seqs=lots", "max_num_seqs must be int"),
    ("chat=smollm2,colour=blue", "unknown setting 'colour'"),
])
def test_a_bad_group_option_says_what_to_write(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_group_option(text)

