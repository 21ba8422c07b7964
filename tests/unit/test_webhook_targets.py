"""The webhook target policy (no server-side request forgery): the pure rules in
services/notifications/domain.py, and the transport that applies them at send time
(channels.PinnedTransport), with an in-process inner transport that records what it
would have sent: no socket is opened, so no address here is ever contacted."""

from ipaddress import ip_address

import httpx
import pytest

from services.notifications import domain
from services.notifications.channels import (
    DeliveryError,
    PinnedTransport,
    TargetRefused,
    _check_status,
    system_resolver,
)


def refusal(url: str, *, dev: bool = False) -> domain.TargetRefusal | None:
    parsed = httpx.URL(url)
    return domain.target_refusal(
        parsed.scheme, parsed.raw_host.decode("ascii"), has_userinfo=bool(parsed.userinfo), allow_insecure=dev
    )


# --- registration: the URL as written --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # the four of the report
        ("http://169.254.169.254/latest/meta-data/", "scheme"),
        ("http://127.0.0.1:8001/sites", "scheme"),
        ("http://[::1]:22/", "scheme"),
        ("http://localhost:4223/", "scheme"),
        # the same targets over https
        ("https://169.254.169.254/latest/meta-data/", "link_local"),
        ("https://127.0.0.1:8001/sites", "loopback"),
        ("https://[::1]:22/", "loopback"),
        ("https://localhost:4223/", "local_name"),
        ("https://LOCALHOST./", "local_name"),
        ("https://api.localhost/", "local_name"),
        ("https://metadata.google.internal/", "local_name"),
        ("https://printer.local/", "local_name"),
        ("https://intake:8001/", "local_name"),  # a single label: a container or an intranet host
        # private, shared, special ranges
        ("https://10.0.0.5/", "private"),
        ("https://172.16.0.1/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://100.64.0.1/", "shared"),
        ("https://[fc00::1]/", "private"),
        ("https://[fe80::1]/", "link_local"),
        ("https://224.0.0.1/", "multicast"),
        ("https://[ff02::1]/", "multicast"),
        ("https://240.0.0.1/", "reserved"),
        ("https://255.255.255.255/", "reserved"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[::]/", "unspecified"),
        # IPv6 spellings of IPv4 targets
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::ffff:169.254.169.254]/", "link_local"),
        ("https://[::ffff:10.0.0.1]/", "private"),
        ("https://[64:ff9b::7f00:1]/", "loopback"),
        ("https://[2002:7f00:1::]/", "loopback"),
        # numeric hosts a resolver reads as IP addresses
        ("https://2130706433/", "numeric_host"),
        ("https://0x7f.1/", "numeric_host"),
        ("https://127.1/", "numeric_host"),
        # credentials in the URL
        ("https://user:secret@hooks.example.org/", "userinfo"),
        ("https://hooks.example.org\\@127.0.0.1/", "userinfo"),
        # not https
        ("ftp://hooks.example.org/", "scheme"),
        ("http://hooks.example.org/", "scheme"),
    ],
)
def test_registration_refuses_non_public_and_non_https_targets(url: str, expected: str) -> None:
    assert refusal(url) == expected
    assert expected in domain.TARGET_REFUSALS


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.org/ehr",
        "https://8.8.8.8/x",
        "https://[2606:4700::1111]:8443/",
        "https://[::ffff:8.8.8.8]/",
    ],
)
def test_https_to_a_public_host_is_allowed(url: str) -> None:
    assert refusal(url) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8001/hook",
        "http://localhost:4223/",
        "http://[::1]:22/",
        "http://10.0.0.5/",
        "http://intake:8001/",
    ],
)
def test_development_allows_http_and_local_receivers(url: str) -> None:
    assert refusal(url, dev=True) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link_local"),
        ("http://[fe80::1]/", "link_local"),
        ("http://[::ffff:169.254.169.254]/", "link_local"),
        ("http://0.0.0.0:8001/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://2130706433/", "numeric_host"),
        ("http://user:pw@127.0.0.1/", "userinfo"),
        ("file:///etc/passwd", "scheme"),
    ],
)
def test_development_still_refuses_the_metadata_endpoint_and_odd_targets(url: str, expected: str) -> None:
    assert refusal(url, dev=True) == expected


def test_every_resolved_address_must_pass() -> None:
    public, private = ip_address("8.8.8.8"), ip_address("10.0.0.7")
    assert domain.addresses_refusal([public], allow_local=False) is None
    assert domain.addresses_refusal([public, private], allow_local=False) == "private"
    assert domain.addresses_refusal([private, public], allow_local=False) == "private"
    assert domain.addresses_refusal([], allow_local=False) == "unresolved"
    assert domain.addresses_refusal([public, private], allow_local=True) is None


def test_refusal_texts_are_fixed_and_never_carry_the_target() -> None:
    for code, text in domain.TARGET_REFUSALS.items():
        assert "://" not in text and code
    assert str(TargetRefused("loopback")) == "target refused: loopback"


# --- send time: the transport ---------------------------------------------------------------------


class Recorder:
    """Stands in for the network: records each request it is given, answers 200."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return httpx.Response(200, headers={"X-Request-Id": "r-1"})

        return httpx.MockTransport(handle)


def resolver(answers: dict[str, list[str]], calls: list[str]):
    async def resolve(host: str, port: int) -> list[domain.IPAddress]:
        calls.append(f"{host}:{port}")
        return [ip_address(a) for a in answers.get(host, [])]

    return resolve


async def post(transport: PinnedTransport, url: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False) as client:
        return await client.post(url, content=b"{}")


async def test_the_request_goes_to_the_checked_address_with_the_name_for_host_and_tls() -> None:
    network, calls = Recorder(), []
    pinned = PinnedTransport(
        network.transport(), resolver({"hooks.example.org": ["8.8.8.8"]}, calls), allow_local=False
    )
    response = await post(pinned, "https://hooks.example.org:8443/ehr?x=1")
    assert response.status_code == 200
    [sent] = network.requests
    assert str(sent.url) == "https://8.8.8.8:8443/ehr?x=1"  # no second lookup can change it
    assert sent.headers["Host"] == "hooks.example.org:8443"
    assert sent.extensions["sni_hostname"] == "hooks.example.org"  # SNI and certificate check
    assert sent.content == b"{}"
    assert calls == ["hooks.example.org:8443"]  # resolved once


async def test_an_ipv6_answer_is_used_as_a_bracketed_literal() -> None:
    network = Recorder()
    pinned = PinnedTransport(
        network.transport(), resolver({"hooks.example.org": ["2606:4700::1111"]}, []), allow_local=False
    )
    await post(pinned, "https://hooks.example.org/ehr")
    assert str(network.requests[0].url) == "https://[2606:4700::1111]/ehr"


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["127.0.0.1"], "loopback"),
        (["169.254.169.254"], "link_local"),
        (["8.8.8.8", "10.1.2.3"], "private"),  # every address, not only the first
        (["::ffff:127.0.0.1"], "loopback"),
        (["100.64.1.1"], "shared"),
        ([], "unresolved"),
    ],
)
async def test_a_name_resolving_to_a_refused_address_is_never_sent(answers: list[str], expected: str) -> None:
    network, calls = Recorder(), []
    pinned = PinnedTransport(network.transport(), resolver({"hooks.example.org": answers}, calls), allow_local=False)
    with pytest.raises(TargetRefused) as refused:
        await post(pinned, "https://hooks.example.org/ehr")
    assert refused.value.refusal == expected and refused.value.retryable is False
    assert network.requests == []
    assert calls == ["hooks.example.org:443"]


async def test_a_refused_literal_is_never_resolved_nor_sent() -> None:
    network, calls = Recorder(), []
    pinned = PinnedTransport(network.transport(), resolver({}, calls), allow_local=False)
    for url in ("http://169.254.169.254/latest/meta-data/", "https://127.0.0.1:8001/sites", "https://[::1]:22/"):
        with pytest.raises(TargetRefused):
            await post(pinned, url)
    assert network.requests == [] and calls == []


async def test_development_sends_to_loopback_but_never_to_link_local() -> None:
    network = Recorder()
    answers = {"receiver.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]}
    pinned = PinnedTransport(network.transport(), resolver(answers, []), allow_local=True)
    await post(pinned, "http://receiver.test:9000/hook")
    assert str(network.requests[0].url) == "http://127.0.0.1:9000/hook"
    with pytest.raises(TargetRefused):
        await post(pinned, "http://metadata.test/latest/meta-data/")
    assert len(network.requests) == 1


async def test_a_resolver_failure_is_a_retryable_delivery_error() -> None:
    async def failing(host: str, port: int) -> list[domain.IPAddress]:
        raise OSError("temporary failure in name resolution")

    pinned = PinnedTransport(Recorder().transport(), failing, allow_local=False)
    with pytest.raises(DeliveryError) as error:
        await post(pinned, "https://hooks.example.org/")
    assert error.value.retryable is True and error.value.reason == "name not resolved"


async def test_the_system_resolver_answers_localhost_from_the_machine() -> None:
    # /etc/hosts: no DNS traffic. What a name like this resolves to is what gets checked.
    addresses = await system_resolver("localhost", 443)
    assert addresses and all(a.is_loopback for a in addresses)
    assert domain.addresses_refusal(addresses, allow_local=False) == "loopback"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_final_failure_not_a_delivery(status: int) -> None:
    with pytest.raises(DeliveryError) as error:
        _check_status(status)
    assert error.value.retryable is False and str(status) in error.value.reason
