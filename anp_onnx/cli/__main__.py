from anp_onnx.cli.main import main

main()
