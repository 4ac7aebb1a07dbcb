"""The class lab on one MLflow server: who is enrolled (`roster`, `enrolment`), the students'
own board of their runs (`leaderboard`), and the teacher's board of champions rescored on the
teacher's machine (`grading`); `commands` holds the teacher's `deep-repro` subcommands."""
