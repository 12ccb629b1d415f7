"""Content detectors: each pattern finds what it is for, and leaves its near misses alone."""

from __future__ import annotations

import time

import orjson
import pytest

from mcp_zero.policy.detectors import LABELS, label_text, label_value, redact

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\n"
    "-----END RSA PRIVATE KEY-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)

SECRETS = {
    "aws access key id": "key AKIAIOSFODNN7EXAMPLE here",
    "aws session key id": "ASIAY34FZKBOKMUTVV7A",
    "aws secret key": "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "pem private key": f"the key:\n{PEM}\nend",
    "openssh private key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk",
    "github classic token": "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8",
    "github oauth token": "gho_" + "x" * 36,
    "github app token": "ghs_" + "9" * 36,
    "github fine-grained token": "github_pat_11ABCDEFG0123456789abc_" + "z" * 59,
    "slack token": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp",
    "google api key": "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    "stripe live key": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "stripe restricted key": "rk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "openai key": "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
    "anthropic key": "sk-ant-api03-Ab3dEf6hIj9kLm2nOp5qRs8tUv1w",
    "jwt": f"Authorization: Bearer {JWT}",
    "password in text": "password=hunter22",
    "passwd in a config": "DB_PASSWD: s3cr3t!",
    "api key in a url": "https://api.example.com/v1?api_key=abcd1234&x=1",
    "token in text": "my token: abc123xyz",
    "password in json text": '{"user": "bob", "password": "hunter2"}',
    "secret in escaped json": '{\\"client_secret\\": \\"s3cr3t-value\\"}',
}

NOT_SECRETS = {
    "akia too short": "AKIA1234567",
    "akia lower case": "akiaiosfodnn7example",
    "pem public key": "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A",
    "ghp too short": "ghp_abc123",
    "slack without a body": "xoxb-",
    "google prefix alone": "AIza is how Google keys start",
    "stripe test key": "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "sk- before words": "sk-some-long-hyphenated-words-here",
    "sk- too short": "sk-abc123def456ghi78x9",
    "jwt-like two parts": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0",
    "token as a word": "the token is valid until noon",
    "a tokens count": "max_tokens: 100",
    "password without a value": "enter your password",
    "password set to null": '{"password": null}',
    "a tokenizer": "tokenizer=bpe",
}

PII = {
    "email": "write to jane.doe+news@mail.example.co.uk today",
    "visa with spaces": "card 4111 1111 1111 1111",
    "mastercard with dashes": "5500-0000-0000-0004",
    "amex, 15 digits": "378282246310005",
    "ssn": "ssn 078-05-1120",
}

NOT_PII = {
    "a 16-digit number failing luhn": "4111 1111 1111 1112",
    "12 digits": "411111111111",
    "an address without a domain": "root@localhost",
    "a handle": "@jane.doe",
    "a date": "2024-01-15",
    "a phone number": "555-123-4567",
    "an ssn with area 000": "000-12-3456",
    "an ssn with group 00": "123-00-4567",
    "an ssn inside a longer number": "1123-45-67890",
}


@pytest.mark.parametrize("text", SECRETS.values(), ids=SECRETS.keys())
def test_secrets_are_labelled_secret(text: str) -> None:
    assert label_text(text) == {"secret"}


@pytest.mark.parametrize("text", NOT_SECRETS.values(), ids=NOT_SECRETS.keys())
def test_near_miss_secrets_are_not_labelled(text: str) -> None:
    assert label_text(text) == frozenset()


@pytest.mark.parametrize("text", PII.values(), ids=PII.keys())
def test_personal_data_is_labelled_pii(text: str) -> None:
    assert label_text(text) == {"pii"}


@pytest.mark.parametrize("text", NOT_PII.values(), ids=NOT_PII.keys())
def test_near_miss_personal_data_is_not_labelled(text: str) -> None:
    assert label_text(text) == frozenset()


def test_arguments_as_json_text_carry_their_labels() -> None:
    arguments = {"config": {"password": "hunter2"}, "to": "ops@example.com", "key": PEM}
    assert label_text(orjson.dumps(arguments).decode()) == LABELS


@pytest.mark.parametrize("text", SECRETS.values(), ids=SECRETS.keys())
def test_every_secret_is_redacted(text: str) -> None:
    redacted, count = redact(text, ["secret"])
    assert count >= 1
    assert "[redacted:secret]" in redacted
    assert label_text(redacted) == frozenset()


def test_a_credential_keeps_its_name_and_loses_its_value() -> None:
    assert redact('{"password": "hunter2"}', ["secret"]) == (
        '{"password": "[redacted:secret]"}',
        1,
    )
    assert redact("token=abc123xyz&page=2", ["secret"]) == ("token=[redacted:secret]&page=2", 1)


def test_a_private_key_block_is_redacted_whole() -> None:
    assert redact(f"before\n{PEM}\nafter", ["secret"]) == ("before\n[redacted:secret]\nafter", 1)


def test_redaction_walks_json_and_copies_what_it_changes() -> None:
    value = {
        "content": [{"type": "text", "text": "mail jane@example.com, key AKIAIOSFODNN7EXAMPLE"}],
        "structuredContent": {"cards": ["4111 1111 1111 1111", "4111 1111 1111 1112"], "n": 3},
        "isError": False,
    }
    before = orjson.dumps(value)
    redacted, count = redact(value, ["pii"])
    assert count == 2
    assert redacted["content"][0]["text"] == "mail [redacted:pii], key AKIAIOSFODNN7EXAMPLE"
    assert redacted["structuredContent"] == {
        "cards": ["[redacted:pii]", "4111 1111 1111 1112"],
        "n": 3,
    }
    assert orjson.dumps(value) == before  # the original is untouched
    both, count = redact(value, ["secret", "pii"])
    assert count == 3
    assert both["content"][0]["text"] == "mail [redacted:pii], key [redacted:secret]"


def test_a_value_without_matches_comes_back_as_it_was() -> None:
    value = {"content": [{"type": "text", "text": "nothing to see"}], "n": [1, 2.5, None, True]}
    redacted, count = redact(value, ["secret", "pii"])
    assert count == 0
    assert redacted is value


def test_redacting_an_unknown_label_raises() -> None:
    with pytest.raises(KeyError):
        redact("x", ["nonsense"])


# Texts on which a backtracking pattern takes time quadratic in their length (10 KB: 1.3 s,
# 40 KB: 30 s each, before the patterns were made linear): each unit repeated to ~1 MiB.
ADVERSARIAL_UNITS = [
    "a.",  # an e-mail's local part
    "a-",
    "a_",  # a credential's name
    "eyJ-",  # a JWT
    "x@a.",  # an e-mail's domain
    "a@",
    "1 ",  # a card number
    "-----BEGIN A ",
    "sk-",
    'password="',
    "password=",
    '"password":"',
    "\\n",
    "\\u000a",
    "eyJaaaaaaaa.",
    "123-45-",
]


@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
def test_labelling_and_redacting_adversarial_text_takes_linear_time(unit: str) -> None:
    text = unit * ((1 << 20) // len(unit))
    start = time.perf_counter()
    label_text(text)
    redact({"content": [{"type": "text", "text": text}]}, ["secret", "pii"])
    # A liveness bound, not a timing assertion: linear patterns take well under a second
    # here; a quadratic one takes hours (the server's event loop frozen all that time).
    assert time.perf_counter() - start < 20.0


@pytest.mark.parametrize(
    "text",
    [
        "x\nAKIAIOSFODNN7EXAMPLE",
        "user=bob\npassword=hunter22",
        "a\tghp_" + "a" * 36,
        "x\nsk-abc123def456ghi789jkl",
        f"Bearer\n{JWT}",
        "\x01AKIAIOSFODNN7EXAMPLE",
        "éAKIAIOSFODNN7EXAMPLE",
        "x-AIzaSyA-1234567890abcdefghijklmnopqrstu",
        "\n-sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
        f"-{JWT}",
    ],
)
def test_a_secret_after_a_control_character_in_arguments_is_labelled(text: str) -> None:
    # as JSON text, a newline before the secret is ``\n``: the argument's own string is read
    assert label_value({"content": text}) == {"secret"}
    assert label_value({"deep": [{"x": text}]}) == {"secret"}
    # (a client's own escapes are decoded first: ``\u000a\u0041KIA…``)
    decoded = orjson.loads(b'{"c": "x\\u000a\\u0041KIAIOSFODNN7EXAMPLE"}')
    assert label_value(decoded) == {"secret"}


def test_argument_keys_and_credential_names_with_their_values_are_labelled() -> None:
    assert label_value({"AKIAIOSFODNN7EXAMPLE": 1}) == {"secret"}
    assert label_value({"config": {"password": "hunter2"}, "key": PEM}) == {"secret"}
    assert label_value({"db_password": 123456}) == {"secret"}
    assert label_value({"to": "ops@example.com"}) == {"pii"}
    assert label_value({"password": None, "token": "ab", "max_tokens": 100}) == frozenset()
    assert label_value({"text": "nothing here", "n": [1, True, None]}) == frozenset()


@pytest.mark.parametrize(
    ("secret", "escaped"),
    [
        ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("ghp_" + "a" * 36, "ghp_" + "a" * 36),
        ("sk-abc123def456ghi789jkl", "sk-abc123def456ghi789jkl"),
        (JWT, JWT),
        ("jane@example.com", "jane@example.com"),
    ],
)
def test_a_secret_after_a_json_escape_in_a_json_text_is_redacted(secret: str, escaped: str) -> None:
    for before in ("\n", "\t", "\r", "\x01"):
        # a tool's text that is the JSON of its structured content
        text = orjson.dumps({"note": f"deploy:{before}{secret}"}).decode()
        redacted, count = redact(text, ["secret", "pii"])
        assert count == 1, text
        assert escaped not in redacted
        orjson.loads(redacted)  # still JSON: the escape before it is kept


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('password="correct horse battery staple"', 'password="[redacted:secret]"'),
        ("password='correct horse battery staple'", "password='[redacted:secret]'"),
        ("DB_PASSWORD=Xy7$k;9(Lm]Qz&8 next", "DB_PASSWORD=[redacted:secret] next"),
        ('{"password": "p@ss w0rd!"}', '{"password": "[redacted:secret]"}'),
        ('{"password": "p\\"ss w0rd!", "a": 1}', '{"password": "[redacted:secret]", "a": 1}'),
        ('{\\"password\\": \\"p@ss w0rd!\\"}', '{\\"password\\": \\"[redacted:secret]\\"}'),
        ("user=bob\npassword=hunter22\nnext", "user=bob\npassword=[redacted:secret]\nnext"),
        ("?api_key=abcd1234&page=2", "?api_key=[redacted:secret]&page=2"),
        ('{"password": "\\nhunter22"}', '{"password": "[redacted:secret]"}'),
    ],
)
def test_a_credential_value_is_redacted_whole(text: str, expected: str) -> None:
    assert redact(text, ["secret"]) == (expected, 1)


def test_the_value_of_a_credential_named_key_is_redacted() -> None:
    value = {"password": "hunter22", "db_token": 123456, "token": None, "max_tokens": 100}
    assert redact(value, ["secret"]) == (
        {
            "password": "[redacted:secret]",
            "db_token": "[redacted:secret]",
            "token": None,
            "max_tokens": 100,
        },
        2,
    )
    assert redact(value, ["pii"]) == (value, 0)


CAMEL_CASE_CREDENTIALS = {
    "accessToken": "abcdef123",
    "refreshToken": "xyz98765",
    "clientSecret": "s3cr3tval",
    "dbPassword": "hunter22",
    "sessionToken": "FwoGZXIvYXdzEBYaD",
    "AccessToken": "aaa11111",
    "privateKey": "MIIEvQIBADANBg",
    "SecretAccessKey": "wJalrXUtnFEMIK7MDENG",  # (`aws sts assume-role` prints it so)
    "passphrase": "correct horse",
}


@pytest.mark.parametrize(
    ("name", "value"), CAMEL_CASE_CREDENTIALS.items(), ids=CAMEL_CASE_CREDENTIALS.keys()
)
def test_camel_case_credential_names_are_labelled_and_redacted(name: str, value: str) -> None:
    # (a name had to follow a separator: accessToken, clientSecret went through in clear)
    pair = {name: value}
    text = orjson.dumps(pair).decode()
    assert label_value(pair) == {"secret"}
    assert label_text(text) == {"secret"}
    assert redact(pair, ("secret",))[0] == {name: "[redacted:secret]"}
    assert redact(text, ("secret",))[0] == orjson.dumps({name: "[redacted:secret]"}).decode()


@pytest.mark.parametrize(
    "ordinary",
    [{"max_tokens": 100}, {"tokenizer": "bpe"}, {"password_policy": "strong"}, {"n": "a Token"}],
)
def test_names_that_merely_contain_a_credential_word_are_not_labelled(
    ordinary: dict[str, object],
) -> None:
    assert label_value(ordinary) == set()
    assert label_text(orjson.dumps(ordinary).decode()) == set()


def test_a_number_that_no_card_network_issues_under_is_no_card() -> None:
    # 10% of 13-19 digit numbers pass the Luhn check: times in milliseconds (17…) among them
    assert label_text("at 1732612345675 ms") == set()  # passes Luhn, starts with 1
    assert label_text("card 4111 1111 1111 1111") == {"pii"}


@pytest.mark.parametrize(
    ("value", "redacted"),
    [
        ({"password": ["hunter22"]}, {"password": "[redacted:secret]"}),
        ({"password": {"value": "hunter22"}}, {"password": "[redacted:secret]"}),
        (
            {"env": [{"name": "DB_PASSWORD", "value": "hunter22"}]},
            {"env": [{"name": "DB_PASSWORD", "value": "[redacted:secret]"}]},
        ),
    ],
    ids=["list", "object", "name-value pair"],
)
def test_a_credential_given_in_a_nested_shape_is_labelled_and_redacted(
    value: dict[str, object], redacted: dict[str, object]
) -> None:
    # (a value one level down, or a k8s-style env pair, went through no-secrets-out)
    assert label_value(value) == {"secret"}
    assert redact(value, ("secret",)) == (redacted, 1)
    ordinary = {"env": [{"name": "PATH", "value": "/usr/bin"}]}
    assert label_value(ordinary) == set()
    assert redact(ordinary, ("secret",)) == (ordinary, 0)


def test_a_card_number_sent_as_a_number_is_redacted() -> None:
    # (labelled pii, and returned in structuredContent as it was)
    assert redact({"card": 4111111111111111, "n": 7}, ("pii",)) == (
        {"card": "[redacted:pii]", "n": 7},
        1,
    )
