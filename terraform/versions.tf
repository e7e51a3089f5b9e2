terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 6.x: data.aws_region's `region` attribute (`name` is deprecated there).
      version = ">= 6.0, < 7.0"
    }
  }
}
