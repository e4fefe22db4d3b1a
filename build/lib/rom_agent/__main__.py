"""`python -m rom_agent` is `rom-agent`."""

from rom_agent.cli import main

raise SystemExit(main())
