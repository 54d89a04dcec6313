"""run_ops.py and thirdparty.py run in child processes only: importing thirdparty here would
define its Autotuner subclasses in the test process (and doctest collection imports every
module), so neither is collected."""

collect_ignore = ["run_ops.py", "thirdparty.py"]
