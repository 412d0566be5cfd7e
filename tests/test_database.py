"""database.py: the plumbing every backing service and process shares."""
import pytest

from database import ConfigError, positive_number, process_name, whole_seconds


@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "1e10", "3601"])
def test_a_number_of_seconds_outside_its_bounds_is_refused(text):
    with pytest.raises(ConfigError, match=f"POLL_INTERVAL must be .* at most 3600, got '{text}'"):
        positive_number({"POLL_INTERVAL": text}, "POLL_INTERVAL", 1, 3600)


def test_whole_seconds_refuse_a_fraction():
    assert whole_seconds({"SESSION_TTL": "60"}, "SESSION_TTL", 1, 3600) == 60
    assert whole_seconds({}, "SESSION_TTL", 86400, 86400) == 86400
    with pytest.raises(ConfigError, match="whole number of seconds from 1 to 3600, got '0.5'"):
        whole_seconds({"SESSION_TTL": "0.5"}, "SESSION_TTL", 1, 3600)


def test_the_process_name_comes_from_whichever_manager_started_us():
    assert process_name({}, "web.1") == "web.1"
    assert process_name({"PS": "web.3"}, "web.1") == "web.3"  # foreman
    assert process_name({"HONCHO_PROCESS_NAME": "web.2", "PS": "web.3"}, "web.1") == "web.2"
    assert process_name({"DYNO": "web.4", "HONCHO_PROCESS_NAME": "web.2"}, "web.1") == "web.4"
    assert process_name({"DYNO": ""}, "web.1") == "web.1"
