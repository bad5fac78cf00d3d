"""Which API replicas a worker subscribes to (fanout.replicas)."""

from __future__ import annotations

import pytest

from fanout.replicas import replica_urls

API = "http://prefect-api:4200/api"


def test_one_server_is_the_api_url() -> None:
    assert replica_urls("", API + "/") == [API]


def test_a_list_of_urls_is_taken_as_given_deduplicated_and_sorted() -> None:
    spec = "http://b:4200/api/, http://a:4200/api,http://b:4200/api"
    assert replica_urls(spec, API) == ["http://a:4200/api", "http://b:4200/api"]


def test_a_host_name_gives_each_of_its_addresses_with_the_api_urls_scheme_port_and_path() -> None:
    # localhost resolves without a DNS server: 127.0.0.1 and, where configured, ::1
    urls = replica_urls("localhost", API)
    assert "http://127.0.0.1:4200/api" in urls
    assert set(urls) <= {"http://127.0.0.1:4200/api", "http://[::1]:4200/api"}


def test_a_host_that_does_not_resolve_raises_so_the_worker_keeps_what_it_knows() -> None:
    with pytest.raises(OSError):
        replica_urls("no-such-host.invalid", API)


@pytest.mark.parametrize("spec", ["a,b", "a/api"])
def test_a_mix_of_host_names_and_paths_is_named(spec: str) -> None:
    with pytest.raises(ValueError, match="FANOUT_API_REPLICAS"):
        replica_urls(spec, API)
