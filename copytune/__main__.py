from copytune.cli import main

main()
