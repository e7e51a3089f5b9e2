terraform {
  # 1.9: a variable's validation may refer to other variables (desired_count, leases_enabled).
  required_version = ">= 1.9.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 6.x: data.aws_region's `region` attribute (`name` is deprecated there).
      version = ">= 6.0, < 7.0"
    }
  }
}
