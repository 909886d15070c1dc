from attnsieve.cli import main

main()
