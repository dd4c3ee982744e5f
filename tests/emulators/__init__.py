"""Stand-alone emulators of real model servers, launched as child processes by the end-to-end tests.

Each emulator is a standard-library-only program (fast to start, no import of shepherd) that prints the
real server's log lines and serves its real routes, so shepherd is tested against what it will meet in
production. Run one as `python -m tests.emulators.NAME` from the repository root or by its file path.
Keep this package marker free of imports: every emulator start imports it.
"""
