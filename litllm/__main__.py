from litllm.cli import main

main()
