"""database.py: the plumbing every backing service and process shares."""
from database import process_name


def test_the_process_name_comes_from_whichever_manager_started_us():
    assert process_name({}, "web.1") == "web.1"
    assert process_name({"PS": "web.3"}, "web.1") == "web.3"  # foreman
    assert process_name({"HONCHO_PROCESS_NAME": "web.2", "PS": "web.3"}, "web.1") == "web.2"
    assert process_name({"DYNO": "web.4", "HONCHO_PROCESS_NAME": "web.2"}, "web.1") == "web.4"
    assert process_name({"DYNO": ""}, "web.1") == "web.1"
