//! The plan registry (the seed's `IBackupPlanRegistry`): plans loaded from
//! `*.toml` files at start or registered through the API, looked up by id.

use std::collections::BTreeMap;
use std::path::Path;

use koan_protocol::plan::BackupPlan;

use crate::error::CoordinatorError;

/// Registered backup plans, by id.
#[derive(Debug, Clone, Default)]
pub struct PlanRegistry {
    plans: BTreeMap<String, Registered>,
}

#[derive(Debug, Clone)]
struct Registered {
    plan: BackupPlan,
    origin: String,
}

impl PlanRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every `*.toml` file of `dir` (in file-name order); an error names the file.
    pub fn load_dir(dir: &Path) -> Result<Self, CoordinatorError> {
        let read_error = |reason: String| CoordinatorError::PlanFile {
            path: dir.to_path_buf(),
            reason,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|error| read_error(format!("cannot read the plans folder: {error}")))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| read_error(error.to_string()))?;
            let path = entry.path();
            let is_toml = path
                .extension()
                .is_some_and(|extension| extension == "toml");
            if is_toml && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut registry = Self::new();
        for path in paths {
            let text =
                std::fs::read_to_string(&path).map_err(|error| CoordinatorError::PlanFile {
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            let plan =
                BackupPlan::from_toml(&text).map_err(|error| CoordinatorError::PlanFile {
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            registry.register_from(plan, path.display().to_string())?;
        }
        Ok(registry)
    }

    /// Validates and registers `plan`; a second plan with the same id is an error.
    pub fn register(&mut self, plan: BackupPlan) -> Result<(), CoordinatorError> {
        plan.validate()?;
        self.register_from(plan, "the API".to_string())
    }

    fn register_from(&mut self, plan: BackupPlan, origin: String) -> Result<(), CoordinatorError> {
        if let Some(existing) = self.plans.get(&plan.plan_id) {
            return Err(CoordinatorError::DuplicatePlan {
                plan_id: plan.plan_id.clone(),
                first: existing.origin.clone(),
                second: origin,
            });
        }
        self.plans
            .insert(plan.plan_id.clone(), Registered { plan, origin });
        Ok(())
    }

    /// The plan registered as `plan_id`.
    pub fn get(&self, plan_id: &str) -> Option<&BackupPlan> {
        self.plans.get(plan_id).map(|registered| &registered.plan)
    }

    /// Every registered plan, by id.
    pub fn list(&self) -> impl Iterator<Item = &BackupPlan> {
        self.plans.values().map(|registered| &registered.plan)
    }

    /// Number of registered plans.
    pub fn len(&self) -> usize {
        self.plans.len()
    }

    /// Whether no plan is registered.
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use koan_protocol::plan::BackupEntity;

    fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("koan-plans-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const ORDERS: &str =
        "plan_id = \"orders:daily\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\n";

    #[test]
    fn loads_toml_files_and_ignores_others() {
        let dir = temp_dir();
        std::fs::write(dir.join("orders.toml"), ORDERS).unwrap();
        std::fs::write(
            dir.join("billing.toml"),
            "plan_id = \"billing\"\n[[entities]]\nname = \"invoices\"\ntable = \"Invoice\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("README.md"), "not a plan").unwrap();
        let registry = PlanRegistry::load_dir(&dir).unwrap();
        assert_eq!(registry.len(), 2);
        let ids: Vec<_> = registry.list().map(|plan| plan.plan_id.as_str()).collect();
        assert_eq!(ids, ["billing", "orders:daily"]);
        assert_eq!(
            registry.get("orders:daily").unwrap().entities[0].table,
            "Order"
        );
        assert!(registry.get("nope").is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = temp_dir();
        std::fs::write(dir.join("broken.toml"), "plan_id = \"x\"\nentitys = []\n").unwrap();
        let error = PlanRegistry::load_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("broken.toml"), "{error}");
        assert!(error.contains("entitys"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();

        let missing = PlanRegistry::load_dir(Path::new("/nonexistent/koan-plans")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/koan-plans"));
    }

    #[test]
    fn duplicate_ids_are_an_error() {
        let dir = temp_dir();
        std::fs::write(dir.join("a.toml"), ORDERS).unwrap();
        std::fs::write(dir.join("b.toml"), ORDERS).unwrap();
        let error = PlanRegistry::load_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("orders:daily"), "{error}");
        assert!(
            error.contains("a.toml") && error.contains("b.toml"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let mut registry = PlanRegistry::new();
        let plan = BackupPlan::new("p").entity(BackupEntity::new("e", "t"));
        registry.register(plan.clone()).unwrap();
        assert!(matches!(
            registry.register(plan),
            Err(CoordinatorError::DuplicatePlan { .. })
        ));
        let invalid = BackupPlan::new("q").entity(BackupEntity::new("../e", "t"));
        assert!(registry.register(invalid).is_err());
    }
}
