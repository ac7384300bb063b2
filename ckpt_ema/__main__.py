from ckpt_ema.cli import main

main()
