//! Identifiers validated at construction: certificate ids and account ids.

use std::fmt;

/// An AWS IoT certificate id (also a CA certificate id): 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertificateId(String);

impl CertificateId {
    /// Validates a certificate id.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        if s.len() != 64 {
            return Err("a certificate id has 64 hex characters");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("a certificate id is lowercase hexadecimal");
        }
        Ok(CertificateId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CertificateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 12-digit AWS account id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountId(String);

impl AccountId {
    /// Validates an account id.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AccountId(s.to_owned()))
        } else {
            Err("an AWS account id has 12 digits")
        }
    }

    /// The account id from a Lambda function ARN (`arn:aws:lambda:region:account:function:name`).
    pub fn from_arn(arn: &str) -> Option<Self> {
        arn.split(':').nth(4).and_then(|a| AccountId::parse(a).ok())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_ids_are_64_lowercase_hex() {
        assert!(CertificateId::parse(&"a".repeat(64)).is_ok());
        assert!(CertificateId::parse(&"A".repeat(64)).is_err());
        assert!(CertificateId::parse(&"a".repeat(63)).is_err());
        assert!(CertificateId::parse(&format!("{}\0", "a".repeat(63))).is_err());
    }

    #[test]
    fn account_ids_come_from_function_arns() {
        let id =
            AccountId::from_arn("arn:aws:lambda:us-east-1:123456789012:function:jitr").unwrap();
        assert_eq!(id.as_str(), "123456789012");
        assert!(AccountId::parse("12345678901x").is_err());
    }
}
