"""The measure wing: exit profiles (`evaluate`), threshold calibration (`calibrate`), exit
placement (`scan`), downstream tasks with confidence intervals and reports (`downstream`), the
memory planner (`plan`) and the lm-evaluation-harness model (`lmeval`)."""
