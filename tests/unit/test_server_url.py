import pytest

from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.launch import LaunchSpec
from prefect_llamacpp.managed import ManagedServer
from prefect_llamacpp.server_url import (
    check_host,
    listens_everywhere,
    parse_server_url,
    server_url_at,
)


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://localhost:8080/", "http://localhost:8080"),
        ("http://localhost:8080/v1", "http://localhost:8080"),
        ("http://localhost:8080/v1/", "http://localhost:8080"),
        ("http://localhost:8080/v1//", "http://localhost:8080"),
        ("  https://gw.example.com/llama/v1  ", "https://gw.example.com/llama"),
        ("https://gw.example.com/llama/", "https://gw.example.com/llama"),
        # "v1" inside a host or a longer segment is not the API suffix.
        ("http://v1.example.com", "http://v1.example.com"),
        ("http://v1.example.com/v1", "http://v1.example.com"),
        ("http://host/proxy/v10", "http://host/proxy/v10"),
        ("http://host/v1/proxy", "http://host/v1/proxy"),
        ("http://host/api/v1beta", "http://host/api/v1beta"),
        ("http://[::1]:8080/v1", "http://[::1]:8080"),
    ],
)
def test_root_and_openai_base(given, root):
    url = parse_server_url(given)
    assert url.root == root
    assert url.openai_base == root + "/v1"
    assert url.endpoint("/health") == root + "/health"


@pytest.mark.parametrize(
    "bad",
    ["", "   ", None, "localhost:8080", "ftp://host/v1", "http://", "//host:8080", "http:///v1"],
)
def test_bad_urls_say_what_a_valid_one_looks_like(bad):
    with pytest.raises(ConfigurationError, match="http://localhost:8080"):
        parse_server_url(bad)


def test_credentials_in_url_are_refused_without_echoing_them():
    with pytest.raises(ConfigurationError) as info:
        parse_server_url("http://user:hunter2@host:8080/v1")
    assert "hunter2" not in str(info.value)
    assert "LLAMACPP_API_KEY" in str(info.value)


def test_query_is_refused():
    with pytest.raises(ConfigurationError, match="query"):
        parse_server_url("http://host:8080/v1?x=1")


def test_settings_validate_the_url_and_read_env(monkeypatch):
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://gpu-1:9000/v1")
    monkeypatch.setenv("LLAMACPP_API_KEY", "k")
    monkeypatch.setenv("LLAMACPP_TIMEOUT", "5")
    settings = LlamaCppSettings()
    assert settings.server_url.root == "http://gpu-1:9000"
    assert settings.api_key.get_secret_value() == "k"
    assert settings.timeout == 5
    with pytest.raises(ValueError, match="not a valid llama.cpp server URL"):
        LlamaCppSettings(base_url="gpu-1:9000")


def test_settings_read_dotenv(tmp_path):
    (tmp_path / ".env").write_text(
        "LLAMACPP_BASE_URL=http://from-dotenv:1234\nLLAMACPP_MODEL_NAME=\n"
    )
    settings = LlamaCppSettings()
    assert settings.base_url == "http://from-dotenv:1234"
    assert settings.model_name == ""  # empty: the model the server reports


def test_get_settings_is_cached_and_resettable(monkeypatch):
    from prefect_llamacpp.config import get_settings

    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://other:1")
    assert get_settings().llamacpp.base_url != "http://other:1"
    get_settings.cache_clear()
    assert get_settings().llamacpp.base_url == "http://other:1"


@pytest.mark.parametrize(
    "bad",
    [
        "http://host:abc/v1",
        "http://host:99999/v1",
        "http://host:0",
        "http://host:/v1",
        "http://exa mple.com/v1",
        "http://-bad-.example.com",
        "http://a..b/v1",
        "http://[::g]:8080",
        "http://[::1/v1",
        "http://host_name:80:90",
    ],
)
def test_bad_ports_and_hosts_are_refused_when_parsed(bad):
    with pytest.raises(ConfigurationError, match="http://localhost:8080"):
        parse_server_url(bad)


@pytest.mark.parametrize(
    "given", ["http://host:8080/V1", "HTTP://host:8080/v1/", "http://host:8080/V1/"]
)
def test_v1_in_any_case_is_the_api_suffix(given):
    assert parse_server_url(given).root == "http://host:8080"


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:hunter2@host/v1",
        "http://hunter2@host/v1",
        "http://host/v1?api_key=hunter2",
        "http://host/v1#hunter2",
        "ftp://admin:hunter2@host/v1",
        "http://host:abc/v1?key=hunter2",
    ],
)
def test_no_error_about_a_url_repeats_a_secret_in_it(url):
    with pytest.raises(ConfigurationError) as info:
        parse_server_url(url)
    assert "hunter2" not in str(info.value) and "hunter2" not in str(info.value.details)
    with pytest.raises(ValueError) as validation:
        LlamaCppSettings(base_url=url)
    assert "hunter2" not in str(validation.value)
    assert "hunter2" not in repr(validation.value.errors(include_input=False))


@pytest.mark.parametrize(
    "bad",
    [
        "http://256.256.256.256:8080/v1",
        "http://300.1.1.1",
        "http://[::1]]:8080",
        "http://1.2.3.4.5",
        "http://999",
        "http://0x7f.1",
        "http://host/v1;key=hunter2",
    ],
)
def test_numeric_hosts_must_be_real_addresses(bad):
    with pytest.raises(ConfigurationError, match="http://localhost:8080"):
        parse_server_url(bad)


@pytest.mark.parametrize(
    "url",
    ["admin:hunter2@127.0.0.1:8080/v1", "http:/admin:hunter2@h/v1", "http:\\\\admin:hunter2@h/v1"],
)
def test_credentials_without_slashes_are_not_echoed(url):
    with pytest.raises(ValueError) as validation:
        LlamaCppSettings(base_url=url)
    assert "hunter2" not in str(validation.value)


@pytest.mark.parametrize("key", ["sk-1\n", " sk-1 ", "sk-1\r\n"])
def test_a_key_pasted_with_white_space_around_it_is_trimmed(key):
    assert LlamaCppSettings(api_key=key).api_key_value() == "sk-1"


@pytest.mark.parametrize("key", ["sk-\n1", "sk 1", "sk-\x001"])
def test_a_key_with_breaks_inside_is_refused_without_echo(key):
    with pytest.raises(ValueError) as info:
        LlamaCppSettings(api_key=key)
    assert "paste it again" in str(info.value) and "sk" not in str(info.value).split("api_key")[-1]


@pytest.mark.parametrize(
    ("host", "root"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("gpu-1.example.com", "http://gpu-1.example.com:8080"),
        ("::1", "http://[::1]:8080"),
        ("[::1]", "http://[::1]:8080"),
        ("fd00::2", "http://[fd00::2]:8080"),
    ],
)
def test_a_listening_address_becomes_one_url(host, root):
    url = server_url_at(host, 8080)
    assert (url.root, url.openai_base) == (root, root + "/v1")


def test_a_server_whose_port_is_not_chosen_yet_still_has_a_url():
    # Events of a start that failed before its port was picked name it.
    assert server_url_at("127.0.0.1", 0).openai_base == "http://127.0.0.1:0/v1"
    unstarted = ManagedServer(LaunchSpec(model="/models/m.gguf", host="::"))
    assert unstarted.base_url == "http://127.0.0.1:0/v1"


@pytest.mark.parametrize(
    ("host", "everywhere"),
    [("0.0.0.0", True), ("::", True), ("[::]", True), ("::0", True), ("", True)]
    + [("127.0.0.1", False), ("::1", False), ("gpu-1", False), ("[::1]", False)],
)
def test_wildcard_listening_addresses(host, everywhere):
    assert listens_everywhere(host) is everywhere


@pytest.mark.parametrize(
    ("given", "host"),
    [("gpu-1", "gpu-1"), ("gpu-1.example.com.", "gpu-1.example.com."), ("10.0.0.5", "10.0.0.5")]
    + [("fd00::5", "fd00::5"), ("[fd00::5]", "fd00::5"), ("FD00:0::5", "fd00::5")],
)
def test_a_bare_host_is_taken(given, host):
    assert check_host(given, "advertise_host") == host


@pytest.mark.parametrize(
    "bad",
    ["", "gpu-1:8080", "http://gpu-1", "gpu-1/llama", "me@gpu-1", "[::1]:8080", "gpu 1"]
    + ["gpu-1:sk-live-SECRET", "10.0.0.300", "[gpu-1]"],
)
def test_a_host_with_more_than_a_host_is_refused_unrepeated(bad):
    with pytest.raises(ConfigurationError, match="advertise_host must be a bare host") as info:
        check_host(bad, "advertise_host")
    assert "SECRET" not in str(info.value) and "llama" not in str(info.value)
